//! Rates the routine trailing window from a service, as the `keel-rater` binary does, and exits
//! with the rater's exit-code contract (0 clean, 1 error, 2 anomaly, 3 another rater holds the
//! lock).
//!
//! ```text
//! DATABASE_URL=postgres://keel@localhost/keel cargo run -p keel-rater --features postgres --example rate_window
//! ```
//!
//! Pass `--dry-run` to compute the diff without writing anything.

use std::process::ExitCode;
use std::str::FromStr;

use keel_rater::postgres::{RunRequest, run};
use keel_rater::{RaterExit, resolve_window};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match rate().await {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(e) => {
            eprintln!("rate_window: {e}");
            ExitCode::from(RaterExit::Error.code())
        }
    }
}

async fn rate() -> Result<RaterExit, Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL to the platform database (postgres://…)")?;
    let options = PgConnectOptions::from_str(&url)?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await?;
    keel_schema::migrate(&pool).await?;
    let now = keel_rater::time::OffsetDateTime::now_utc();
    let (window, explicit) = resolve_window(None, None, now, false)?;
    let dry_run = std::env::args().any(|a| a == "--dry-run");
    let outcome = run(
        &pool,
        &options,
        RunRequest {
            window,
            explicit,
            dry_run,
            now,
        },
    )
    .await?;
    if let Some(report) = &outcome.report {
        println!(
            "rated {} hours from {} to {}: {} inserted, {} updated",
            window.hours(),
            window.start(),
            window.end(),
            report.inserted.count,
            report.updated.count
        );
    }
    Ok(outcome.exit)
}
