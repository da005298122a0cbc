//! `keel-rater`: Rates hourly usage with reconcile, single-flight, and an exit-code contract that pages on a rewritten bill.
//!
//! Today it applies the schema (`migrate`); its main loop arrives with its crate's issue.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_service::cli::{DatabaseArgs, LogArgs};

/// Rates hourly usage with reconcile, single-flight, and an exit-code contract that pages on a rewritten bill.
#[derive(Parser)]
#[command(name = "keel-rater", version, after_help = keel_service::cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the embedded database migrations and exit.
    Migrate(DatabaseArgs),
}

fn main() -> ExitCode {
    let cli: Cli = keel_service::cli::parse();
    keel_service::run(&cli.log, async move {
        match cli.command {
            Command::Migrate(db) => keel_service::migrate(&db).await,
        }
    })
}
