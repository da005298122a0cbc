//! Hourly usage rating with reconcile, an exit-code contract, single-flight, and request-body
//! capture.
//!
//! A rating run aggregates `billing_event` per (auth id, meter, UTC hour) over a window, prices
//! it with the effective-dated `prices`, and compares the result with `rated_usage` hour by
//! hour: new hours are inserted, changed hours updated, and hours whose events are gone, whose
//! quantity, event count or amount went down (or whose currency changed), or that lost their
//! price are losses. A loss is a revenue change: on a routine run (the default trailing window)
//! it means billed events vanished or a price was cut under hours already billed, so
//! the run logs ERROR and exits 2; on an explicit `--backfill` it is the convergence the
//! operator asked for, so it logs INFO and exits 0 — see [`exit_code`]. Amounts follow the
//! [`money`] model, so no stored value can fail a run.
//!
//! The default build is pure; feature `postgres` adds the adapters.
//!
//! # Deciding how a run exits, without I/O
//!
//! ```
//! use keel_rater::{RaterExit, resolve_window};
//!
//! let now = keel_rater::time::macros::datetime!(2026-11-22 10:17 UTC);
//! // No --since/--until: the routine trailing window, ending at the last whole hour.
//! let (window, explicit) = resolve_window(None, None, now, false).expect("a valid window");
//! assert!(!explicit);
//! assert_eq!(window.end(), keel_rater::time::macros::datetime!(2026-11-22 10:00 UTC));
//! assert_eq!(window.hours(), 24);
//! assert_eq!(RaterExit::Clean.code(), 0);
//! ```
//!
//! # Rating a window from a service (feature `postgres`)
//!
//! ```no_run
//! use keel_rater::postgres::{RunRequest, run};
//!
//! # async fn demo(pool: sqlx::PgPool, options: sqlx::postgres::PgConnectOptions)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! let now = keel_rater::time::OffsetDateTime::now_utc();
//! let (window, explicit) = keel_rater::resolve_window(None, None, now, false)?;
//! // `options` opens the single-flight lock's own connection (not a pooled one).
//! let outcome = run(&pool, &options, RunRequest { window, explicit, dry_run: false, now }).await?;
//! std::process::exit(i32::from(outcome.exit.code()));
//! # }
//! ```
//!
//! # Public dependencies
//!
//! [`time`] 0.3 (windows and timestamps) and [`rust_decimal`] 1 (quantities and money) appear in
//! the public API and are re-exported; the `postgres` adapters take sqlx 0.9 pools.

pub use rust_decimal;
pub use time;

mod capture;
mod exit;
mod ingest;
#[cfg(feature = "postgres")]
pub mod io_log;
#[cfg(feature = "postgres")]
pub mod metrics;
pub mod money;
#[cfg(feature = "postgres")]
pub mod postgres;
mod report;
mod window;

pub use capture::{Captured, MAX_REQUEST_ID_LEN, capture, sanitize_request_id};
pub use exit::{DeletionSeverity, RaterExit, deletion_severity, exit_code};
pub use ingest::{BillingEvent, DEFAULT_SOURCE, IngestError, MAX_FUTURE_SKEW};
pub use report::{
    Changes, DETAIL_CAP, LateUsage, RateReport, Rated, RatedChange, UsageKey, loss_attributes,
    truncate_on_char_boundary,
};
pub use window::{MAX_SPAN_DAYS, Window, WindowError, resolve_window};
