//! Walks one propagation through `decide`: a legitimate no-op is applied, an unexpected skip
//! retries on the schedule and dead-letters after its last attempt, never `Applied`.
//!
//! Run with `cargo run -p keel-propagation --example decide`.

use keel_propagation::{ApplyOutcome, RetryPolicy, SkipReason, Transition, decide};
use time::macros::datetime;

fn main() {
    let policy = RetryPolicy::standard();
    let now = datetime!(2026-11-22 10:00 UTC);

    for raw in [
        "already_at_target",
        "postgres-admin secret missing",
        "pod not found",
    ] {
        let outcome = Ok(ApplyOutcome::Skipped(SkipReason::from_raw(raw)));
        println!(
            "skip {raw:?}: {}",
            describe(&decide(1, &outcome, &policy, now))
        );
    }

    println!(
        "\nan unexpected skip, attempt by attempt ({} attempts):",
        policy.max_attempts()
    );
    let outcome = Ok(ApplyOutcome::Skipped(SkipReason::from_raw(
        "postgres_admin_secret_missing",
    )));
    for attempt in 1..=policy.max_attempts() {
        println!(
            "  attempt {attempt:>2}: {}",
            describe(&decide(attempt, &outcome, &policy, now))
        );
    }
}

fn describe(transition: &Transition) -> String {
    match transition {
        Transition::Applied { skipped, .. } => match skipped {
            None => "applied".to_owned(),
            Some(skip) => format!("applied (a legitimate no-op: {})", skip.as_str()),
        },
        Transition::Retry {
            next_attempt_at, ..
        } => format!("retry at {next_attempt_at}"),
        Transition::DeadLetter { .. } => "dead-lettered".to_owned(),
        // `Transition` is `#[non_exhaustive]`: a transition added in a later Keel lands here.
        _ => "another transition".to_owned(),
    }
}
