//! `keel-orphan-sweep`: measures the orphan backlog (customer namespaces and databases no live
//! resource owns) and, only behind a second gate, reclaims orphans through keel-provision's
//! audited deprovision chokepoint.
//!
//! Both gates default off: `ORPHAN_DB_SWEEP_ENABLED` (off: every tick is a DEBUG no-op, and no
//! database or Kubernetes client is even built) and `ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED`. Hourly
//! by default; no tick at start-up unless `--run-on-start`; `--once` for a CronJob scheduled at
//! the same interval. Each period is claimed once in the platform database (by its clock), so a
//! period's tick runs once however many replicas or CronJob runs there are; the burn-in lives
//! there too.

mod protections;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_orphan_sweep::postgres::{PgDatabaseInventory, PgLiveTokens, PgSweepState};
use keel_orphan_sweep::{
    FingerprintKey, Inventory, Reclaimer, SweepConfig, SweepMetrics, Sweeper, TickReport,
};
use keel_provision::kube::KubeNamespaceBackend;
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{Backend, ProvisionMetrics, Provisioner};
use keel_service::cli::{DatabaseArgs, DatabaseUrl, EXIT_USAGE, LogArgs};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// The process's allocator: jemalloc, which keeps freed memory for reuse across the work
/// loop's ticks and batches instead of returning and re-faulting it (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const EXIT_CODES: &str = "\
Exit codes:
  0   success (with --once: the tick ran cleanly, or the sweep is disabled)
  1   error (configuration, database; with --once: the tick failed and found zero candidates)
  2   with --once: the tick ran but needs attention (a reclaim failed, was refused, or was
      stopped by a shutdown or a lost period claim, or the circuit breaker held reclaims back)
  3   with --once: skipped, this period was already claimed (by another replica or run)
  64  usage error";

/// `--once`: the tick ran but needs attention.
const EXIT_ATTENTION: u8 = 2;
/// `--once`: the period was already claimed.
const EXIT_SKIPPED: u8 = 3;

/// The shortest grace window accepted: objects younger than this are never candidates.
const MIN_GRACE: Duration = Duration::from_secs(10 * 60);
/// The shortest interval (period) accepted.
const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// Detects orphaned customer backends (audit-only by default); reclaims only through the audited
/// deprovision chokepoint.
#[derive(Parser)]
#[command(
    name = "keel-orphan-sweep",
    version,
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    sweep: SweepArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the embedded database migrations and exit.
    Migrate(keel_service::MigrateArgs),
    /// List, add or lift platform-held reclaim protections (audited; destroys nothing).
    #[command(subcommand)]
    Protections(protections::ProtectionsCommand),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum InventoryKind {
    /// Customer namespaces (`instant-customer-*`) on Kubernetes.
    Kubernetes,
    /// Customer databases (`cust_*`) on the shared Postgres cluster.
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Log lines only.
    Text,
    /// Also print each tick's report (with the review list) as one JSON line on stdout (NDJSON).
    Json,
}

#[derive(Args)]
struct SweepArgs {
    /// Postgres connection URL of the platform database. Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: Option<DatabaseUrl>,
    /// Master gate: off makes every tick a DEBUG no-op (no list, no database read, no metric,
    /// no database or Kubernetes client at all). Accepts true/false, 1/0, yes/no, on/off.
    #[arg(
        long,
        env = "ORPHAN_DB_SWEEP_ENABLED",
        value_parser = parse_enabled,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    enabled: bool,
    /// Destructive gate: reclaim confirmed orphans through the audited chokepoint. Meaningless
    /// unless --enabled is on too. Accepts true/false, 1/0, yes/no, on/off.
    #[arg(
        long,
        env = "ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED",
        value_parser = parse_destructive,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    destructive: bool,
    /// Which inventory to sweep.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_INVENTORY", value_enum, default_value_t = InventoryKind::Kubernetes)]
    inventory: InventoryKind,
    /// Time between ticks, and the period each tick is claimed for (at least 1m, at most 30
    /// days), e.g. 1h, 30m, 1h30m, 1d. A CronJob running --once must be scheduled at this interval.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    interval: Duration,
    /// Run a tick at start-up instead of waiting one interval.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_RUN_ON_START")]
    run_on_start: bool,
    /// Run one tick and exit (for a CronJob).
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_ONCE")]
    once: bool,
    /// How old an object must be before it can be a candidate (at least 10m), e.g. 1h, 1d.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_GRACE", default_value = "1h", value_parser = parse_duration)]
    grace: Duration,
    /// Consecutive periods a candidate must be seen reclaimable in before it may be reclaimed.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_CONFIRM_TICKS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    confirm_ticks: u32,
    /// How long a candidate must have been seen reclaimable, without a break, before it may be
    /// reclaimed (with --confirm-ticks, both must hold), e.g. 2h.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_BURN_IN", default_value = "2h", value_parser = parse_duration)]
    burn_in: Duration,
    /// Rate limit: most reclaims per tick, the fewest failed reclaims first, then the oldest;
    /// the rest wait for the next tick.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_MAX_RECLAIMS", default_value_t = 5)]
    max_reclaims: usize,
    /// Circuit breaker: when more than this fraction (0 to 1) of this installation's inventory
    /// is confirmed orphaned at once, nothing is reclaimed that tick.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_MAX_FRACTION", default_value_t = 0.5, value_parser = parse_fraction, allow_negative_numbers = true)]
    max_fraction: f64,
    /// Admin URL of the shared Postgres cluster (the `postgres` inventory and its reclaims).
    /// Default: the platform database's server. Never logged.
    #[arg(
        long,
        env = "KEEL_CLUSTER_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    cluster_database_url: Option<DatabaseUrl>,
    /// Key for the token fingerprints in logs (at least 16 bytes). Without it, a random key per
    /// process is used and fingerprints only correlate within one process. The former variable
    /// ORPHAN_SWEEP_FINGERPRINT_KEY is still read when this one is unset.
    #[arg(
        long,
        env = FINGERPRINT_KEY_ENV,
        hide_env_values = true,
        value_name = "KEY"
    )]
    fingerprint_key: Option<String>,
    /// Print each tick's review list.
    #[arg(long, env = "KEEL_ORPHAN_SWEEP_OUTPUT", value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Address for /metrics, /healthz and /readyz (not served with --once). Its own variable
    /// and default, so the sweep and the runner can share a pod or an environment.
    #[arg(
        long,
        env = "KEEL_ORPHAN_SWEEP_LISTEN",
        default_value = "0.0.0.0:9091",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
}

/// The fingerprint key's variable.
const FINGERPRINT_KEY_ENV: &str = "KEEL_ORPHAN_SWEEP_FINGERPRINT_KEY";

/// The fingerprint key's former variable, still read as an alias of [`FINGERPRINT_KEY_ENV`].
const LEGACY_FINGERPRINT_KEY_ENV: &str = "ORPHAN_SWEEP_FINGERPRINT_KEY";

/// The fingerprint key: `--fingerprint-key` or `KEEL_ORPHAN_SWEEP_FINGERPRINT_KEY` (`parsed`)
/// win; else the former variable's value (`legacy`). A legacy value that is not UTF-8 is an
/// error naming the variable, never its value.
fn resolve_fingerprint_key(
    parsed: Option<String>,
    legacy: Option<std::ffi::OsString>,
) -> Result<Option<String>, String> {
    match (parsed, legacy) {
        (Some(key), _) => Ok(Some(key)),
        (None, None) => Ok(None),
        (None, Some(legacy)) => legacy
            .into_string()
            .map(Some)
            .map_err(|_| format!("{LEGACY_FINGERPRINT_KEY_ENV} is not valid UTF-8")),
    }
}

/// Longest accepted interval or grace window (30 days).
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a duration flag accepts, for its error message.
const DURATION_FORMS: &str =
    "expected a duration such as 90s, 30m, 1h30m, 1d or plain seconds (days are 24 hours)";

/// Parses a duration up to 30 days: plain seconds (`3600`), or units from seconds to weeks,
/// combined as in `1h30m`, `1d 12h` or `P1DT2H` (the friendly and ISO 8601 forms `jiff` reads),
/// a day being 24 hours. Months and years, negative or zero-less garbage are refused.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let duration = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(s.parse().map_err(|_| "at most 30 days (720h)".to_owned())?)
    } else {
        let span: jiff::Span = s.parse().map_err(|_| DURATION_FORMS.to_owned())?;
        let signed = span
            .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
            .map_err(|_| DURATION_FORMS.to_owned())?;
        Duration::try_from(signed).map_err(|_| "a duration cannot be negative".to_owned())?
    };
    if duration > MAX_DURATION {
        return Err("at most 30 days (720h)".to_owned());
    }
    Ok(duration)
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        Ok(_) | Err(_) => Err("expected a fraction between 0 and 1, e.g. 0.5".to_owned()),
    }
}

/// A gate's value: true/false, 1/0, yes/no, on/off (any case); anything else names the flag and
/// its variable.
fn parse_gate(s: &str, flag: &str, env: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "expected true or false (also 1/0, yes/no, on/off) for {flag} or {env}"
        )),
    }
}

fn parse_enabled(s: &str) -> Result<bool, String> {
    parse_gate(s, "--enabled", "ORPHAN_DB_SWEEP_ENABLED")
}

fn parse_destructive(s: &str) -> Result<bool, String> {
    parse_gate(s, "--destructive", "ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED")
}

impl SweepArgs {
    fn config(&self) -> SweepConfig {
        SweepConfig {
            enabled: self.enabled,
            destructive: self.destructive,
            grace: self.grace,
            interval: self.interval,
            confirm_ticks: self.confirm_ticks,
            burn_in: self.burn_in,
            max_reclaims: self.max_reclaims,
            max_fraction: self.max_fraction,
            ..SweepConfig::default()
        }
    }

    /// The floors no flag may go under.
    fn check_floors(&self) -> Result<(), String> {
        if self.grace < MIN_GRACE {
            return Err("--grace (KEEL_ORPHAN_SWEEP_GRACE) must be at least 10m".to_owned());
        }
        if self.interval < MIN_INTERVAL {
            return Err("--interval (KEEL_ORPHAN_SWEEP_INTERVAL) must be at least 1m".to_owned());
        }
        Ok(())
    }
}

/// Parses the command line: the sweep's own flags cannot be combined with `migrate` (its
/// variables can: one environment serves both), while `--log-format` may stand before or after it.
fn parse_cli(args: Vec<std::ffi::OsString>) -> Result<Cli, keel_service::cli::UsageExit> {
    keel_service::cli::try_parse_exclusive::<Cli>(args, |cli| match cli.command {
        Some(Command::Migrate(_)) => Some("migrate"),
        Some(Command::Protections(_)) => Some("protections"),
        None => None,
    })
}

fn main() -> ExitCode {
    let cli = match parse_cli(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(exit) => return keel_service::cli::report(exit),
    };
    match cli.command {
        Some(Command::Migrate(db)) => {
            return keel_service::run(&cli.log, async move { keel_service::migrate(&db).await });
        }
        Some(Command::Protections(command)) => {
            return keel_service::run(&cli.log, protections::run(command));
        }
        None => {}
    }
    let mut args = cli.sweep;
    args.fingerprint_key = match resolve_fingerprint_key(
        args.fingerprint_key.take(),
        std::env::var_os(LEGACY_FINGERPRINT_KEY_ENV),
    ) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = args.check_floors() {
        eprintln!("error: {e}\n\n{EXIT_CODES}");
        return ExitCode::from(EXIT_USAGE);
    }
    if !args.enabled {
        // The master gate is off: no database, no Kubernetes client, nothing to read.
        return keel_service::run(&cli.log, async move { disabled(args).await });
    }
    let Some(database_url) = args.database_url.clone() else {
        eprintln!("error: no database: pass --database-url or set DATABASE_URL\n\n{EXIT_CODES}");
        return ExitCode::from(EXIT_USAGE);
    };
    let key = match args.fingerprint_key.as_deref().map(FingerprintKey::new) {
        Some(Ok(key)) => key,
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        None => FingerprintKey::ephemeral(),
    };
    keel_service::run(
        &cli.log,
        async move { sweep(args, database_url, key).await },
    )
}

/// The sweep with its master gate off: no client is built and nothing is read; the metrics say
/// it is disabled.
async fn disabled(args: SweepArgs) -> anyhow::Result<ExitCode> {
    tracing::info!("orphan sweep disabled (ORPHAN_DB_SWEEP_ENABLED is off): nothing is read");
    if args.once {
        print_report(&args, &TickReport::Disabled)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut registry = Registry::default();
    let _metrics = SweepMetrics::register(&mut registry);
    let shutdown =
        keel_service::shutdown::on_signal().context("could not install signal handlers")?;
    let listener = keel_service::http::bind(args.listen)
        .await
        .with_context(|| format!("could not listen on {}", args.listen))?;
    // Ready by configuration: it depends on nothing, so a disabled Deployment still rolls out.
    keel_service::http::serve_with_readiness(
        listener,
        Arc::new(registry),
        keel_service::http::Readiness::without_dependencies(),
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn sweep(
    args: SweepArgs,
    database_url: DatabaseUrl,
    key: FingerprintKey,
) -> anyhow::Result<ExitCode> {
    if args.fingerprint_key.is_none() {
        tracing::warn!(
            "KEEL_ORPHAN_SWEEP_FINGERPRINT_KEY is not set: token fingerprints only correlate within this process"
        );
    }
    let db = DatabaseArgs { database_url };
    let pool = keel_service::connect(&db, "keel-orphan-sweep", 4).await?;
    let cluster = args
        .cluster_database_url
        .as_ref()
        .unwrap_or(&db.database_url)
        .connect_options()?;
    let mut registry = Registry::default();
    let metrics = SweepMetrics::register(&mut registry);
    let live = PgLiveTokens::new(pool.clone());
    let state = PgSweepState::new(pool.clone(), holder_name());
    let store = PgResourceStore::new(pool.clone());
    let provision_metrics = ProvisionMetrics::register(&mut registry);
    let config = args.config();
    let registry = Arc::new(registry);
    let readiness = keel_service::http::Readiness::new(pool.clone());
    match args.inventory {
        InventoryKind::Postgres => {
            let backend = PgClusterBackend::new(cluster, None, 2);
            let inventory = PgDatabaseInventory::new(backend.admin_pool().clone());
            let reclaimer = reclaimer(&config, store, backend, provision_metrics);
            let sweeper = Sweeper::new(inventory, live, reclaimer, state, config, metrics, key);
            drive(sweeper, &args, registry, readiness).await
        }
        InventoryKind::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .context("could not configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
            let inventory = keel_orphan_sweep::kube::KubeNamespaceInventory::new(client.clone());
            let backend = KubeNamespaceBackend::new(client, "https://kubernetes.default.svc");
            let reclaimer = reclaimer(&config, store, backend, provision_metrics);
            let sweeper = Sweeper::new(inventory, live, reclaimer, state, config, metrics, key);
            drive(sweeper, &args, registry, readiness).await
        }
    }
}

/// Who claims periods, for operators reading `orphan_sweep_periods` (the pod's host name).
fn holder_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "keel-orphan-sweep".to_owned())
}

/// The chokepoint, wired only when both gates are on.
fn reclaimer<B: Backend>(
    config: &SweepConfig,
    store: PgResourceStore,
    backend: B,
    metrics: ProvisionMetrics,
) -> Option<Provisioner<PgResourceStore, B>> {
    (config.enabled && config.destructive).then(|| Provisioner::new(store, backend, metrics))
}

/// The exit code of a `--once` run.
fn once_exit_code(report: &TickReport) -> ExitCode {
    match report {
        TickReport::Failed { .. } => ExitCode::FAILURE,
        TickReport::Skipped { .. } => ExitCode::from(EXIT_SKIPPED),
        TickReport::Swept { .. } if report.needs_attention() => ExitCode::from(EXIT_ATTENTION),
        TickReport::Swept { .. } | TickReport::Disabled => ExitCode::SUCCESS,
    }
}

async fn drive<I: Inventory, R: Reclaimer>(
    mut sweeper: Sweeper<I, PgLiveTokens, R, PgSweepState>,
    args: &SweepArgs,
    registry: Arc<Registry>,
    readiness: keel_service::http::Readiness,
) -> anyhow::Result<ExitCode> {
    tracing::info!(
        enabled = args.enabled,
        destructive = args.destructive,
        armed = sweeper.armed(),
        inventory = ?args.inventory,
        "orphan sweep starting"
    );
    let shutdown =
        keel_service::shutdown::on_signal().context("could not install signal handlers")?;
    // A shutdown stops a running tick before its next reclaim.
    let stop = sweeper.stop_flag();
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    if args.once {
        let report = sweeper.tick(OffsetDateTime::now_utc()).await;
        print_report(args, &report)?;
        return Ok(once_exit_code(&report));
    }
    let listener = keel_service::http::bind(args.listen)
        .await
        .with_context(|| format!("could not listen on {}", args.listen))?;
    // Its own stop: /metrics keeps answering while the sweep drains (FND-16).
    let ops = keel_service::http::OpsServer::spawn_with_readiness(listener, registry, readiness);
    run_loop(&mut sweeper, args, &shutdown).await?;
    ops.stop().await.context("the metrics listener failed")?;
    tracing::info!("orphan sweep stopped");
    Ok(ExitCode::SUCCESS)
}

async fn run_loop<I: Inventory, R: Reclaimer>(
    sweeper: &mut Sweeper<I, PgLiveTokens, R, PgSweepState>,
    args: &SweepArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let start = if args.run_on_start {
        tokio::time::Instant::now()
    } else {
        tokio::time::Instant::now() + args.interval
    };
    let mut ticks = tokio::time::interval_at(start, args.interval.max(MIN_INTERVAL));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticks.tick() => {
                let report = sweeper.tick(OffsetDateTime::now_utc()).await;
                print_report(args, &report)?;
            }
        }
    }
}

/// With `--output json`, one compact JSON line per tick on stdout (NDJSON), whatever its outcome.
fn print_report(args: &SweepArgs, report: &TickReport) -> anyhow::Result<()> {
    if args.output == Output::Json {
        println!("{}", serde_json::to_string(report)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// OPS-14: `--log-format` may stand before `migrate` (an invalid value is reported as
    /// such), while a sweep flag given with `migrate` is still a usage error.
    #[test]
    fn the_log_format_may_precede_migrate_but_sweep_flags_may_not() {
        let parse = |args: &[&str]| {
            let mut line = vec![std::ffi::OsString::from("keel-orphan-sweep")];
            line.extend(args.iter().map(std::ffi::OsString::from));
            parse_cli(line)
        };
        let url = "postgres://u@127.0.0.1:1/x";
        for args in [
            vec!["--log-format", "json", "migrate", "--database-url", url],
            vec!["migrate", "--log-format", "json", "--database-url", url],
        ] {
            let cli = parse(&args).unwrap_or_else(|e| panic!("{args:?}: {}", e.message));
            assert_eq!(cli.log.log_format, keel_service::cli::LogFormat::Json);
            assert!(matches!(cli.command, Some(Command::Migrate(_))));
        }
        let exit = parse(&["--log-format", "xml", "migrate"]).err().unwrap();
        assert_eq!(exit.code, EXIT_USAGE);
        assert!(
            exit.message
                .starts_with("error: invalid value 'xml' for '--log-format"),
            "{}",
            exit.message
        );
        for args in [
            vec!["--once", "migrate", "--database-url", url],
            vec!["--grace", "1d", "migrate", "--database-url", url],
        ] {
            let exit = parse(&args).err().unwrap();
            assert_eq!(exit.code, EXIT_USAGE, "{args:?}");
            assert!(
                exit.message
                    .starts_with("error: the subcommand 'migrate' cannot be used with '--"),
                "{args:?}: {}",
                exit.message
            );
            assert!(exit.message.contains("Usage:"), "{}", exit.message);
        }
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
    }

    /// OPS-24: durations take days and combined units, a day being 24 hours, and keep the
    /// 30-day cap; anything else is refused with the accepted forms named.
    #[test]
    fn durations_accept_days_and_combined_units_up_to_thirty_days() {
        let secs = Duration::from_secs;
        for (text, expected) in [
            ("90s", secs(90)),
            ("30m", secs(1800)),
            ("1h", secs(3600)),
            ("1h30m", secs(5400)),
            ("1h 30m", secs(5400)),
            ("1d", secs(86_400)),
            ("1d12h", secs(129_600)),
            ("2w", secs(1_209_600)),
            ("P1DT2H", secs(93_600)),
            ("3600", secs(3600)),
            ("0", secs(0)),
            ("30d", MAX_DURATION),
            ("720h", MAX_DURATION),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for too_long in ["31d", "30d1s", "721h", "2592001", "99999999999999999999999"] {
            let err = parse_duration(too_long).unwrap_err();
            assert!(err.contains("30 days"), "{too_long}: {err}");
        }
        for bad in ["", "1x", "h", "1 month", "1y", "-1h", "1h-", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        let err = parse_duration("1 month").unwrap_err();
        assert!(err.contains("1h30m"), "{err}");
    }

    /// OPS-16: the fingerprint key is read from `KEEL_ORPHAN_SWEEP_FINGERPRINT_KEY`; the former
    /// `ORPHAN_SWEEP_FINGERPRINT_KEY` is an alias the new name (or the flag) wins over.
    #[test]
    fn the_new_fingerprint_key_variable_wins_over_its_former_alias() {
        let arg = Cli::command()
            .get_arguments()
            .find(|a| a.get_id() == "fingerprint_key")
            .map(|a| a.get_env().map(ToOwned::to_owned))
            .expect("no --fingerprint-key");
        assert_eq!(
            arg.as_deref(),
            Some(std::ffi::OsStr::new(FINGERPRINT_KEY_ENV))
        );
        let some = |s: &str| Some(s.to_owned());
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            resolve_fingerprint_key(some("new-key-0123456789"), os("old-key-0123456789")),
            Ok(some("new-key-0123456789"))
        );
        assert_eq!(
            resolve_fingerprint_key(None, os("old-key-0123456789")),
            Ok(some("old-key-0123456789"))
        );
        assert_eq!(
            resolve_fingerprint_key(some("new-key-0123456789"), None),
            Ok(some("new-key-0123456789"))
        );
        assert_eq!(resolve_fingerprint_key(None, None), Ok(None));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt as _;
            let bad = std::ffi::OsString::from_vec(vec![0x73, 0xff, 0x65]);
            let err = resolve_fingerprint_key(None, Some(bad)).unwrap_err();
            assert!(err.contains(LEGACY_FINGERPRINT_KEY_ENV), "{err}");
        }
    }

    /// OPS-16: the sweep's listen address has its own variable and default, unlike the runner's
    /// (`keel_service::http::HttpArgs`), so the two never collide in one pod or environment.
    #[test]
    fn the_sweep_and_the_runner_listen_apart() {
        use clap::Args as _;
        let listen_of = |command: &clap::Command| {
            let find = |c: &clap::Command| {
                c.get_arguments().find(|a| a.get_id() == "listen").map(|a| {
                    (
                        a.get_env().map(ToOwned::to_owned),
                        a.get_default_values().to_vec(),
                    )
                })
            };
            find(command)
                .or_else(|| command.get_subcommands().find_map(find))
                .expect("no --listen")
        };
        let runner = listen_of(&keel_service::http::HttpArgs::augment_args(
            clap::Command::new("runner"),
        ));
        let sweep = listen_of(&Cli::command());
        assert_ne!(runner.0, sweep.0, "the same listen variable");
        assert_ne!(runner.1, sweep.1, "the same default address");
    }

    fn parse_args(args: &[&str]) -> Result<Cli, keel_service::cli::UsageExit> {
        let mut line = vec!["keel-orphan-sweep"];
        line.extend(args);
        keel_service::cli::try_parse_from::<Cli, _, _>(line)
    }

    /// SWEEP-11: the gates accept the seed's spellings (Go's ParseBool: 1, TRUE, ...), and a bad
    /// value names the flag and its variable.
    #[test]
    fn gates_accept_common_spellings_and_name_the_variable_on_error() {
        for (value, expected) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("on", true),
            ("false", false),
            ("0", false),
            ("No", false),
            ("off", false),
        ] {
            let cli = parse_args(&["--enabled", value, "--destructive", value]).unwrap();
            assert_eq!(
                (cli.sweep.enabled, cli.sweep.destructive),
                (expected, expected),
                "{value}"
            );
        }
        assert!(parse_args(&["--enabled"]).unwrap().sweep.enabled);
        for value in ["maybe", "2", "tru"] {
            let err = parse_args(&["--enabled", value]).err().unwrap();
            assert_eq!(err.code, EXIT_USAGE);
            assert!(
                err.message.contains("ORPHAN_DB_SWEEP_ENABLED"),
                "{}",
                err.message
            );
        }
        let err = parse_args(&["--max-fraction", "-0.1"]).err().unwrap();
        assert!(err.message.contains("between 0 and 1"), "{}", err.message);
    }

    /// SWEEP-11: no grace window under 10 minutes, no interval under a minute.
    #[test]
    fn grace_and_interval_have_floors() {
        for args in [
            ["--grace", "0"],
            ["--grace", "5m"],
            ["--interval", "0"],
            ["--interval", "1s"],
        ] {
            let cli = parse_args(&args).unwrap();
            assert!(cli.sweep.check_floors().is_err(), "{args:?}");
        }
        let cli = parse_args(&["--grace", "10m", "--interval", "1m"]).unwrap();
        assert!(cli.sweep.check_floors().is_ok());
    }

    /// SWEEP-5, SWEEP-11: `--once` says what happened: skipped (3), needs attention (2), failed
    /// (1), fine (0).
    #[test]
    fn a_skipped_once_run_exits_3_and_one_needing_attention_exits_2() {
        use keel_orphan_sweep::{Action, Blocker, CandidateView};
        let code = |report: &TickReport| format!("{:?}", once_exit_code(report));
        let exit = |n: u8| format!("{:?}", ExitCode::from(n));
        assert_eq!(
            code(&TickReport::Skipped { period: None }),
            exit(EXIT_SKIPPED)
        );
        assert_eq!(code(&TickReport::Failed { stage: "list" }), exit(1));
        assert_eq!(code(&TickReport::Disabled), exit(0));
        let view = |action: Action, blocked_by: Option<Blocker>| CandidateView {
            kind: "customer_database",
            name_masked: "cust_abcd…".into(),
            fingerprint: None,
            age_seconds: 7200,
            protected: false,
            managed: true,
            owned: true,
            seen_ticks: 3,
            failed_reclaims: 0,
            would_reclaim: blocked_by.is_none(),
            blocked_by,
            action,
        };
        let swept = |candidates| TickReport::Swept {
            period: 1,
            inventory: 3,
            armed: true,
            candidates,
        };
        assert_eq!(code(&swept(vec![view(Action::Reclaimed, None)])), exit(0));
        assert_eq!(
            code(&swept(vec![view(Action::Reported, Some(Blocker::BurnIn))])),
            exit(0)
        );
        for attention in [
            view(Action::Failed, None),
            view(Action::Refused, None),
            view(Action::AbortedByCap, Some(Blocker::Breaker)),
        ] {
            assert_eq!(code(&swept(vec![attention])), exit(EXIT_ATTENTION));
        }
    }

    /// SWEEP-11: with the master gate off the sweep builds no database or Kubernetes client: a
    /// `--once` run without any database succeeds.
    #[tokio::test]
    async fn a_disabled_sweep_needs_no_database_or_cluster() {
        let cli = parse_args(&["--once", "--inventory", "kubernetes"]).unwrap();
        assert!(cli.sweep.database_url.is_none());
        let code = disabled(cli.sweep).await.unwrap();
        assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::SUCCESS));
    }

    #[test]
    fn both_gates_default_off_and_every_flag_has_an_env_var() {
        let cli: Cli = keel_service::cli::try_parse_from(["keel-orphan-sweep"]).unwrap();
        let config = cli.sweep.config();
        assert!(!config.enabled && !config.destructive);
        assert_eq!(config, SweepConfig::default());
        assert_eq!(cli.sweep.interval, Duration::from_secs(3600));
        assert!(!cli.sweep.run_on_start && !cli.sweep.once);
        let command = Cli::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_env().is_some(), "--{id} has no env var");
        }
    }

    #[test]
    fn durations_and_fractions_parse_or_fail_with_a_usage_error() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(
            parse_duration("1mo").is_err(),
            "months have no fixed length"
        );
        assert!(
            parse_duration("18446744073709551615").is_err(),
            "never an overflow"
        );
        assert!(parse_duration("721h").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_fraction("1.5").is_err());
        let err = keel_service::cli::try_parse_from::<Cli, _, _>([
            "keel-orphan-sweep",
            "--interval",
            "soon",
        ])
        .err()
        .unwrap();
        assert_eq!(err.code, EXIT_USAGE);
        let err = keel_service::cli::try_parse_from::<Cli, _, _>([
            "keel-orphan-sweep",
            "--confirm-ticks",
            "0",
        ])
        .err()
        .unwrap();
        assert_eq!(err.code, EXIT_USAGE);
    }
}
