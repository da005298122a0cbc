//! `keel-rater`: rates hourly usage with reconcile, single-flight, and an exit-code contract that
//! pages when a routine run lowers or removes a prior bill, or finds usage it cannot rate.
//!
//! Run it from a CronJob (`concurrencyPolicy: Forbid`); it also takes a single-flight lock of its
//! own, on the connection that does the work. With no flags it re-rates the trailing 24 closed
//! UTC hours (a routine run). `--backfill` makes the run an explicit backfill (quiet about
//! losses), optionally over `--since/--until`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_rater::postgres::{RunOutcome, RunRequest, run_until};
use keel_rater::{Changes, RaterExit, Window, resolve_window};
use keel_service::cli::{DatabaseUrl, EXIT_USAGE, LogArgs};
use sqlx::{ConnectOptions, Connection};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The process's allocator: jemalloc, which keeps freed memory for reuse across the work
/// loop's ticks and batches instead of returning and re-faulting it (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const EXIT_CODES: &str = "\
Exit codes:
  0   clean (a dry run that succeeded)
  1   error (configuration, database, lost single-flight lock, stopped by a signal)
  2   attention: an anomaly (unpriced or out-of-range hours, late usage), or a routine run
      lowered or removed previously rated usage (page someone); also when the run failed after
      committing such a loss, or took over one an earlier run committed and never reported
  3   skipped: another rater holds the single-flight lock; nothing was rated
  64  usage error";

/// Rates hourly usage with reconcile, single-flight, and an exit-code contract.
#[derive(Parser)]
#[command(
    name = "keel-rater",
    version,
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    rate: RateArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the embedded database migrations and exit.
    Migrate(keel_service::MigrateArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A readable summary.
    Text,
    /// One JSON document (counts plus the first changes of each kind, with old and new values).
    Json,
}

#[derive(Args)]
struct RateArgs {
    /// Postgres connection URL (postgres://user:password@host:port/database). Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: Option<DatabaseUrl>,
    /// A direct URL to PostgreSQL (or a session-mode pool) for the rater, used instead of
    /// DATABASE_URL when that goes through a transaction-pooling proxy. Never logged.
    #[arg(
        long,
        env = "KEEL_RATER_DIRECT_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    direct_database_url: Option<DatabaseUrl>,
    /// An explicit backfill: losses are the convergence asked for (INFO, exit 0). Required
    /// with --since/--until, so a leftover variable never silences a routine run.
    #[arg(long, env = "KEEL_RATER_BACKFILL")]
    backfill: bool,
    /// Start of a backfill window (RFC 3339, on the hour), e.g. 2026-11-20T00:00:00Z.
    #[arg(long, env = "KEEL_RATER_SINCE", value_parser = parse_time, requires = "backfill")]
    since: Option<OffsetDateTime>,
    /// End of a backfill window (RFC 3339, on the hour, exclusive).
    #[arg(long, env = "KEEL_RATER_UNTIL", value_parser = parse_time, requires = "backfill")]
    until: Option<OffsetDateTime>,
    /// Accept a backfill window longer than 31 days.
    #[arg(long, env = "KEEL_RATER_ALLOW_LONG_SPAN")]
    allow_long_span: bool,
    /// Show the diff (counts, and old and new values of the first changes) with SELECTs only:
    /// no lock, no ledger row, nothing written. Exits 0 and says how a real run would exit.
    #[arg(long, env = "KEEL_RATER_DRY_RUN")]
    dry_run: bool,
    /// How to print the result.
    #[arg(long, env = "KEEL_RATER_OUTPUT", value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Push the run's metrics to this Prometheus Pushgateway URL (http://host:port) at the end
    /// of every run, as job `keel-rater`. Never logged.
    #[arg(
        long,
        env = "KEEL_RATER_PUSH_METRICS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    push_metrics_url: Option<String>,
    /// How long a push may take, connecting included, before it is given up (logged at ERROR;
    /// the run's exit code is unchanged).
    #[arg(
        long,
        env = "KEEL_RATER_PUSH_METRICS_TIMEOUT_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=300),
        value_name = "SECONDS"
    )]
    push_metrics_timeout_secs: u64,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    let at = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("expected RFC 3339, e.g. 2026-11-20T00:00:00Z ({e})"))?;
    keel_audit::utc_in_range(at)
        .ok_or_else(|| "out of range: a time must fall in the years 0001 to 9999 in UTC".to_owned())
}

/// Parses the command line: the rater's own flags cannot be combined with `migrate` (its
/// variables can: one environment serves both), while `--log-format` may stand before or after it.
fn parse_cli(args: Vec<std::ffi::OsString>) -> Result<Cli, keel_service::cli::UsageExit> {
    keel_service::cli::try_parse_exclusive::<Cli>(args, |cli| match cli.command {
        Some(Command::Migrate(_)) => Some("migrate"),
        None => None,
    })
}

fn main() -> ExitCode {
    let cli = match parse_cli(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(exit) => return keel_service::cli::report(exit),
    };
    if let Some(Command::Migrate(db)) = cli.command {
        return keel_service::run(&cli.log, async move { keel_service::migrate(&db).await });
    }
    let args = cli.rate;
    let now = OffsetDateTime::now_utc();
    // The window first: a bad --since is reported as such whatever else is missing.
    let (window, _) = match resolve_window(args.since, args.until, now, args.allow_long_span) {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let push_url = match args
        .push_metrics_url
        .as_deref()
        .map(keel_rater::metrics::PushUrl::parse)
        .transpose()
    {
        Ok(url) => url,
        Err(e) => {
            eprintln!("error: --push-metrics-url: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let explicit = args.backfill;
    let Some(database_url) = args
        .direct_database_url
        .clone()
        .or_else(|| args.database_url.clone())
    else {
        eprintln!(
            "error: no database: pass --database-url or set DATABASE_URL \
             (or KEEL_RATER_DIRECT_URL)\n\n{EXIT_CODES}"
        );
        return ExitCode::from(EXIT_USAGE);
    };
    keel_service::run(&cli.log, async move {
        // First of all (a runtime is needed): from here on a signal is a stop the run records.
        let mut stop = std::pin::pin!(stop_signal());
        // No per-statement logging: sqlx's "slow statement" WARN would print the whole rating
        // statement on every large, healthy run; each day's duration is logged at INFO instead.
        let options = database_url.connect_options()?.disable_statement_logging();
        // One direct connection first, so an unreachable database reports its cause at once.
        tokio::select! {
            probed = PgConnectionProbe::check(&options) => probed?,
            () = &mut stop => {
                anyhow::bail!("stopped by a termination signal before connecting; nothing was rated")
            }
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_lazy_with(options.clone().application_name("keel-rater"));
        let lock_options = options.application_name("keel-rater-lock");
        let request = RunRequest {
            window,
            explicit,
            dry_run: args.dry_run,
            now,
        };
        tracing::info!(window = %window, explicit, dry_run = args.dry_run, "rating");
        let result = run_until(&pool, &lock_options, request, &mut stop).await;
        if let Some(url) = &push_url {
            let deadline = std::time::Duration::from_secs(args.push_metrics_timeout_secs);
            push_metrics(&pool, url, deadline).await;
        }
        let outcome = match result {
            Ok(outcome) => outcome,
            // Committed losses page however the run ended: the error is logged as every failure
            // is, and the exit is 2, not 1.
            Err(e) if e.exit() == keel_rater::RaterExit::Attention => {
                let e = anyhow::Error::new(e).context("the rating run failed");
                tracing::error!(error = keel_service::error_chain(&e), "failed");
                return Ok(ExitCode::from(keel_rater::RaterExit::Attention.code()));
            }
            Err(e) => return Err(anyhow::Error::new(e).context("the rating run failed")),
        };
        print(&outcome, window, explicit, args.dry_run, args.output)?;
        Ok(ExitCode::from(outcome.exit.code()))
    })
}

struct PgConnectionProbe;

impl PgConnectionProbe {
    async fn check(options: &sqlx::postgres::PgConnectOptions) -> anyhow::Result<()> {
        let conn = sqlx::PgConnection::connect_with(options)
            .await
            .context("could not connect to the database")?;
        let _ = conn.close().await;
        Ok(())
    }
}

/// Completes on SIGTERM (a Kubernetes deadline or drain) or Ctrl-C. The handlers are installed
/// when this is called, not when the future is first polled: a signal that arrives while the
/// run is still taking its lock is then a stop the run records, never the default disposition
/// that kills the process (exit 143) with no ledger row.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            match handlers {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Some(mut term), None) => {
                    term.recv().await;
                }
                (None, Some(mut int)) => {
                    int.recv().await;
                }
                (None, None) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn push_metrics(
    pool: &sqlx::PgPool,
    url: &keel_rater::metrics::PushUrl,
    deadline: std::time::Duration,
) {
    let body = match keel_rater::metrics::render(pool).await {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "could not read the metrics from the run ledger");
            return;
        }
    };
    if let Err(e) = keel_rater::metrics::push(url, &body, deadline).await {
        tracing::error!(error = %e, "could not push the rater's metrics");
    }
}

fn print(
    outcome: &RunOutcome,
    window: Window,
    explicit: bool,
    dry_run: bool,
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let doc = serde_json::json!({
                "window_start": window.start().format(&Rfc3339)?,
                "window_end": window.end().format(&Rfc3339)?,
                "explicit": explicit,
                "dry_run": dry_run,
                "exit_code": outcome.exit.code(),
                "would_exit_code": outcome.would_exit.code(),
                "run_id": outcome.run_id,
                "report": outcome.report,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Text => {
            let kind = if explicit { "backfill" } else { "routine" };
            println!(
                "{kind} window {window}{}",
                if dry_run {
                    " (dry run: nothing written)"
                } else {
                    ""
                }
            );
            match &outcome.report {
                None => println!("skipped: another rater holds the single-flight lock"),
                Some(report) => {
                    println!(
                        "inserted {}, updated {}, lowered {}, unchanged {}, deleted {}, price lost {}, unpriced {}, out of range {}",
                        report.inserted.count,
                        report.updated.count,
                        report.lowered.count,
                        report.unchanged,
                        report.deleted.count,
                        report.price_lost.count,
                        report.unpriced.count,
                        report.out_of_range.count,
                    );
                    let show = |label: &str, changes: &Changes| {
                        for change in &changes.details {
                            println!("  {label} {change}");
                        }
                        let shown = changes.details.len() as u64;
                        if changes.count > shown {
                            println!("  … and {} more {label}", changes.count - shown);
                        }
                    };
                    show("lowered", &report.lowered);
                    show("deleted", &report.deleted);
                    show("price lost", &report.price_lost);
                    show("unpriced", &report.unpriced);
                    show("out of range", &report.out_of_range);
                    if dry_run {
                        show("inserted", &report.inserted);
                        show("updated", &report.updated);
                    }
                    if let Some(late) = &report.late {
                        println!(
                            "late usage: {} hours outside the window disagree with their rating \
                             ({} late events; {} hours lowered or emptied); run: {}",
                            late.hours,
                            late.events,
                            late.lowered,
                            late.backfill_command()
                        );
                    }
                    if dry_run && outcome.would_exit != RaterExit::Clean {
                        println!("a real run would exit {}", outcome.would_exit.code());
                    }
                    if outcome.exit == RaterExit::Attention {
                        println!("attention: see the ERROR lines above");
                    }
                }
            }
        }
    }
    Ok(())
}
