//! keel-rater against a real Postgres (a fresh migrated database per test).

mod hardening;
mod incremental;
mod io_log;
mod pgbouncer;
mod rating;
