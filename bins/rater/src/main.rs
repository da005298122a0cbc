//! `keel-rater`: rates hourly usage with reconcile, single-flight, and an exit-code contract that
//! pages when a routine run rewrites a prior bill.
//!
//! Run it from a CronJob (`concurrencyPolicy: Forbid`); it also takes a single-flight lock of its
//! own. With no `--since/--until` it re-rates the trailing 24 closed UTC hours (a routine run);
//! either flag makes the window explicit (a backfill).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_rater::postgres::{RunOutcome, RunRequest, run};
use keel_rater::{RaterExit, Window, resolve_window};
use keel_service::cli::{DatabaseArgs, DatabaseUrl, EXIT_USAGE, LogArgs};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const EXIT_CODES: &str = "\
Exit codes:
  0   clean
  1   error (configuration, database)
  2   attention: an anomaly, or a routine run deleted previously rated usage (page someone)
  3   skipped: another rater holds the single-flight lock; nothing was written
  64  usage error";

/// Rates hourly usage with reconcile, single-flight, and an exit-code contract.
#[derive(Parser)]
#[command(
    name = "keel-rater",
    version,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true
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
    Migrate(DatabaseArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A readable summary.
    Text,
    /// One JSON document (the full diff).
    Json,
}

#[derive(Args)]
struct RateArgs {
    /// Postgres connection URL (postgres://user:password@host:port/database). Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: Option<DatabaseUrl>,
    /// Start of an explicit window (RFC 3339, on the hour), e.g. 2026-11-20T00:00:00Z.
    #[arg(long, env = "KEEL_RATER_SINCE", value_parser = parse_time)]
    since: Option<OffsetDateTime>,
    /// End of an explicit window (RFC 3339, on the hour, exclusive).
    #[arg(long, env = "KEEL_RATER_UNTIL", value_parser = parse_time)]
    until: Option<OffsetDateTime>,
    /// Accept an explicit window longer than 31 days.
    #[arg(long, env = "KEEL_RATER_ALLOW_LONG_SPAN")]
    allow_long_span: bool,
    /// Show the full diff (inserted, updated, deleted keys and amounts) without writing.
    #[arg(long, env = "KEEL_RATER_DRY_RUN")]
    dry_run: bool,
    /// How to print the result.
    #[arg(long, env = "KEEL_RATER_OUTPUT", value_enum, default_value_t = Output::Text)]
    output: Output,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("expected RFC 3339, e.g. 2026-11-20T00:00:00Z ({e})"))
}

fn main() -> ExitCode {
    let cli: Cli = keel_service::cli::parse();
    if let Some(Command::Migrate(db)) = cli.command {
        return keel_service::run(&cli.log, async move { keel_service::migrate(&db).await });
    }
    let args = cli.rate;
    let Some(database_url) = args.database_url.clone() else {
        eprintln!("error: no database: pass --database-url or set DATABASE_URL\n\n{EXIT_CODES}");
        return ExitCode::from(EXIT_USAGE);
    };
    let now = OffsetDateTime::now_utc();
    let (window, explicit) = match resolve_window(args.since, args.until, now, args.allow_long_span)
    {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    keel_service::run(&cli.log, async move {
        let db = DatabaseArgs { database_url };
        let pool = keel_service::connect(&db, "keel-rater", 4).await?;
        let lock_options = db
            .database_url
            .connect_options()?
            .application_name("keel-rater-lock");
        let request = RunRequest {
            window,
            explicit,
            dry_run: args.dry_run,
            now,
        };
        tracing::info!(window = %window, explicit, dry_run = args.dry_run, "rating");
        let outcome = run(&pool, &lock_options, request)
            .await
            .context("the rating run failed")?;
        print(&outcome, window, explicit, args.dry_run, args.output)?;
        Ok(ExitCode::from(outcome.exit.code()))
    })
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
            match (&outcome.report, outcome.exit) {
                (None, _) => println!("skipped: another rater holds the single-flight lock"),
                (Some(report), exit) => {
                    println!(
                        "inserted {}, updated {}, unchanged {}, deleted {}, unpriced {}",
                        report.inserted.len(),
                        report.updated.len(),
                        report.unchanged,
                        report.deleted.len(),
                        report.unpriced.len()
                    );
                    for change in &report.deleted {
                        println!("  deleted {} (was {})", change.key, change.amount);
                    }
                    if exit == RaterExit::Attention {
                        println!("attention: see the ERROR lines above");
                    }
                }
            }
        }
    }
    Ok(())
}
